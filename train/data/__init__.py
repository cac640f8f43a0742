"""The training data: scanning the images, captions and masks, buckets, caches, caption encoding."""
