"""What comes back from recipients: opens and clicks (later bounces and complaints), machine detection, event retention."""
