"""Network layers: the SASA attention layer, its positional terms, and the stems."""

from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.layers.stems import AttentionStem, ConvStem, make_stem

__all__ = ["AttentionStem", "ConvStem", "LocalSelfAttention2d", "make_stem"]
