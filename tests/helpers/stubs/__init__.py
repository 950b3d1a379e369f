"""Stand-ins for heavy packages that a test dependency imports but a test never uses."""
