"""The doors clients come in by: one adapter per protocol over the synthesis core."""
