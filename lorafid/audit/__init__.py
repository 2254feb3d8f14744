"""The weight audit: pairing, the spectrum of each delta, the streaming engine, reports, summaries, the store."""
