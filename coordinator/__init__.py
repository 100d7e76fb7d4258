"""sparecycles coordinator: HTTP API, MQTT dispatch, scheduler, quorum, persistent store."""
