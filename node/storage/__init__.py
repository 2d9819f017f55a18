"""Storage and queues: the durable instance store, its SQLite index, the job queue and the
queue of result deliveries, all in one SQLite database behind small interfaces."""
