"""The speakd daemon."""
