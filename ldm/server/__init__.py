"""`ldm serve`: the AUTOMATIC1111 HTTP API and a web page over one model worker (ldm/server/)."""
