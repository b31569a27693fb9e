"""The staged pipeline: stages, fair queues, vocoder windows and their cost model."""
