"""Retrieval: metrics, indexes and figures; imports no model code."""
