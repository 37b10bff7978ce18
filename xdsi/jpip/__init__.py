"""JPIP (ISO/IEC 15444-9): interactive delivery of the JPEG 2000 images the archive holds (issue 16)."""
