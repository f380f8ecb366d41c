"""mixrank.engines: engine builders, footprint and throughput measurement, reports, CI gate."""
