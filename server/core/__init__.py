"""The transport-agnostic synthesis core: utterances, their text budget, segmentation and cancel."""
