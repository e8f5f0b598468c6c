"""The operator command line, `tracewatch` (`cli.main`)."""
