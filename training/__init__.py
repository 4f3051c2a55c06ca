"""Training of the builtin encoder and decoder (``pixelrelay train encoder|decoder``)."""
