"""Test harness: a served device in-process, guest RAM, and guest drivers played over a client."""
