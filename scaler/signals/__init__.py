"""Readers for what the scaler observes: broker queues, host and worker resources."""
