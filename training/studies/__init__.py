"""Studies beyond the accuracy table: base-to-new classes (issue 21) and a task added alone (issue 20)."""
