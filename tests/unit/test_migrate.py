from libs.cassandra.migrate import load_versions, split_statements


def test_statements_split_on_semicolons_and_comments_are_dropped():
    cql = "-- a table; with a semicolon in a comment\nCREATE TABLE a (x int PRIMARY KEY);\n\n" \
          "CREATE TABLE b (y int PRIMARY KEY); -- trailing\n"
    assert split_statements(cql) == ["CREATE TABLE a (x int PRIMARY KEY)",
                                     "CREATE TABLE b (y int PRIMARY KEY)"]


def test_shipped_versions_are_numbered_from_one_and_every_statement_may_run_again():
    versions = load_versions()
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    for v in versions:
        assert v.description
        for statement in v.statements:
            upper = statement.upper()
            assert ("IF NOT EXISTS" in upper if upper.startswith(("CREATE", "ALTER"))
                    else "IF EXISTS" in upper), statement
