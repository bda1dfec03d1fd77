"""The demo: a simulator of the Prime Intellect build API, and its command line."""
