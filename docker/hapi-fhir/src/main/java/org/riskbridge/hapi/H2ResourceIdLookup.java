package org.riskbridge.hapi;

import org.hibernate.resource.jdbc.spi.StatementInspector;

import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Lets H2 answer HAPI's lookup of many resource ids with an index instead of a full table scan.
 *
 * <p>To turn client-assigned ids ({@code Patient/abc}) into row keys, HAPI's {@code IdHelperService} sends one
 * statement per batch of ids: {@code ... from HFJ_RESOURCE rt1_0 where (rt1_0.RES_TYPE=? and rt1_0.FHIR_ID=? or
 * rt1_0.RES_TYPE=? and rt1_0.FHIR_ID=? or ...)}. It does so for every OR-list search on a reference
 * ({@code subject=Patient/a,Patient/b,...}) and for every transaction bundle whose entries reference existing
 * resources. PostgreSQL plans that OR with the (RES_TYPE, FHIR_ID) index; H2 2.3 cannot use an index for an OR of
 * ANDs over parameters and reads the whole table once per statement, comparing every row with every id (with 100
 * ids and 25,000 resources, about 70% of a transaction's time went there). The same condition written as a row-value
 * IN list, {@code (rt1_0.RES_TYPE,rt1_0.FHIR_ID) in ((?,?),(?,?),...)}, is planned with the index. The parameters
 * keep their order, so the rewrite changes the plan only, never the rows. Statements of any other shape (a single
 * id, numeric ids, ids without a type) pass unchanged.
 */
public class H2ResourceIdLookup implements StatementInspector {

	private static final String PAIR = "(\\w+)\\.RES_TYPE=\\? and \\1\\.FHIR_ID=\\?";
	private static final Pattern OR_OF_PAIRS =
			Pattern.compile("\\(" + PAIR + "((?: or \\1\\.RES_TYPE=\\? and \\1\\.FHIR_ID=\\?)+)\\)");
	private static final String MARKER = ".FHIR_ID=? or ";

	@Override
	public String inspect(String theSql) {
		if (theSql == null || !theSql.contains(MARKER) || !theSql.contains("HFJ_RESOURCE")) {
			return theSql;
		}
		Matcher matcher = OR_OF_PAIRS.matcher(theSql);
		StringBuilder retVal = new StringBuilder(theSql.length());
		while (matcher.find()) {
			String alias = matcher.group(1);
			int pairs = 1 + countOccurrences(matcher.group(2), " or ");
			StringBuilder replacement = new StringBuilder(32 + 6 * pairs);
			replacement.append("((").append(alias).append(".RES_TYPE,").append(alias).append(".FHIR_ID) in (");
			for (int i = 0; i < pairs; i++) {
				replacement.append(i == 0 ? "(?,?)" : ",(?,?)");
			}
			replacement.append("))");
			matcher.appendReplacement(retVal, Matcher.quoteReplacement(replacement.toString()));
		}
		matcher.appendTail(retVal);
		return retVal.toString();
	}

	private static int countOccurrences(String theText, String theNeedle) {
		int count = 0;
		for (int at = theText.indexOf(theNeedle); at >= 0; at = theText.indexOf(theNeedle, at + theNeedle.length())) {
			count++;
		}
		return count;
	}
}
