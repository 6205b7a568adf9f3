"""Fuzz targets, structure-aware generators and the regression corpus (see README, `make fuzz`)."""
