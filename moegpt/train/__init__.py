"""Training: schedules, one step, the loop."""
