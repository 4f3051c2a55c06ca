"""Image encoders: image -> Description."""
