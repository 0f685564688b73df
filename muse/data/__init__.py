"""Datasets: image folders, webdataset shards, pre-encoded token shards, and the emoji builder."""
