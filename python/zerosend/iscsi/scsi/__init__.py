"""SCSI: sense and unit vocabulary, the command table, and the command families."""
