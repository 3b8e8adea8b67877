"""The producer side: send() and send_many() store messages and hand their ids to the workers."""
