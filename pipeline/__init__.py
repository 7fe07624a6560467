"""Data pipeline: object storage, COCO ingestion, Parquet preparation and Ray Data streams.

Never imports ``model`` or ``jobs``.
"""
