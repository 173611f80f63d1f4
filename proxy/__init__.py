"""pgpilot's online half: the pooling proxy and everything on its hot path."""
