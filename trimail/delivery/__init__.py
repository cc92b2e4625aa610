"""Delivery: routing, DNS, the delivery agents (smtp, bounce) and their results."""
