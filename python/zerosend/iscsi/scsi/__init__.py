"""The target's scsi layer."""
