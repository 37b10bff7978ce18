"""The official IHE schemas and WSDLs we ship (data), and the one module of standard constants."""
