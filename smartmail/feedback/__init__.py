"""What comes back from recipients: opens and clicks (later bounces, complaints), machine detection, retention."""
