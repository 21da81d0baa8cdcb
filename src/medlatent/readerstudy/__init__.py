"""Blinded reader study of reconstructions: study creation, the reader web app, and the paper's analysis.

The app needs the ``app`` extra (FastAPI, uvicorn); the chart needs matplotlib.
"""
