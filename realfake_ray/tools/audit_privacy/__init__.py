"""``realfake audit-privacy``: ``driver`` (shadow runs on Ray) and ``lira`` (splits, offline LiRA, ROC)."""
