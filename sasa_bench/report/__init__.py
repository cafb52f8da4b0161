"""Reports: the paper's numbers as data, tables and figures beside ours."""
