"""What the scripts share about the processes they start: reading their tree and memory from /proc, and
stopping a process with everything it started."""
