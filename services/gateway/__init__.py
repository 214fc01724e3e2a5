"""Gateway: the public weir.v1 API — authentication, validation, admission, submission."""
