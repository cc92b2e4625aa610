"""Delivery: routing, the delivery agents (smtp, local, virtual, bounce) and their results."""
