"""Node security (IHE ATNA Secure Node): TLS contexts and their start-up checks."""
