"""Test helpers, one per job: paths (``paths``), free ports, process trees and servers
(``services``), S3 (``fixtures_s3``, ``faultproxy``), audio, shards and configs
(``factories``)."""
