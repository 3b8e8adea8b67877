"""Who mail goes to: contacts, lists, imports, exports, segments and unsubscribes."""
