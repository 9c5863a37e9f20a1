"""What a run leaves behind, shared by training and evaluation: its logs (tracking), its report
card (report) and the metrics both report (metrics: bits per byte, the classification report)."""
