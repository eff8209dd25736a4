"""One iSCSI connection: login, the READ and write paths, task management, liveness."""
