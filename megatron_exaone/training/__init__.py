"""Training loop pieces: optimizer, LR schedules, the quick-start job."""
