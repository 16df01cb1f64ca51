"""Planner: the article's arithmetic as a tool (hardware figures so far)."""
