"""Training pipeline of M3Bind: data adapters, teachers, stage 1 (align), stage 2 (distil), evaluation."""
