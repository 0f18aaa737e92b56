"""diloco_grow."""
