"""scalable_rec."""
