"""Style-vector analysis on saved features, no model code: k-means clustering (``clustering``) and cosine ranking
(``vectors``). The command-line tools in ``tools/`` read the files and call these."""
