"""Where results go: local folders and S3 prefixes (``sinks``), and S3 settings and clients
(``s3``)."""
