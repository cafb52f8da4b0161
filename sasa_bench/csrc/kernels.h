// Entry points of the CPU kernels (bound to Python in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

// Local self-attention, q/k/v [B,N,*,H,W]: returns {out [B,N,Dv,H,W], lse [B,N,H,W]}.
std::vector<torch::Tensor> sasa_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor rel_row, torch::Tensor rel_col,
                                                  int64_t K, bool has_k, bool has_rel, bool mask);
// Returns {dq, dk (empty without keys), dv, d_rel [K, D]: rel_row's then rel_col's columns}.
std::vector<torch::Tensor> sasa_attention_backward(torch::Tensor g, torch::Tensor q,
                                                   torch::Tensor k, torch::Tensor v,
                                                   torch::Tensor rel_row, torch::Tensor rel_col,
                                                   torch::Tensor lse, int64_t K, bool has_k,
                                                   bool has_rel, bool mask);

// Attention stem: Wv [C,Ci,16] (empty with vmap), A [heads,Ci,Ci], G [heads,16,Ci,16];
// bn_scale/bn_shift [C] or empty (then not pooled).
torch::Tensor stem_forward(torch::Tensor x, torch::Tensor Wv, torch::Tensor A, torch::Tensor G,
                           torch::Tensor vmap, int64_t heads, int64_t C, torch::Tensor bn_scale,
                           torch::Tensor bn_shift);
// Returns {gx, gW, gRt, gv (empty without vmap)}.
std::vector<torch::Tensor> stem_backward(torch::Tensor x, torch::Tensor W, torch::Tensor Rt,
                                         torch::Tensor vmap, torch::Tensor gy, int64_t heads);
