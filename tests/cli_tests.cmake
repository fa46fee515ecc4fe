# CLI tests are added here (see below).
