"""Package data: label -> ROI group tables and the post-mortem iron reference table."""
